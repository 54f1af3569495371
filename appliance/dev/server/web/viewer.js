// The dev server's viewer: joins the room with livekit-client at its default options,
// shows the avatar's video and plays its audio.
//
// Query parameters (all optional): url (the LiveKit server, default: this page's host),
// token (default: ask ./token), identity (whose tracks to show, default: the first
// participant that publishes video), mouth=x0,y0,x1,y1 (the mouth box at 512x512:
// record per frame how open the mouth is, for the browser test).
// State and measurements are in window.viewer for tests to read.
'use strict';

const { Room, RoomEvent, Track } = LivekitClient;
const params = new URLSearchParams(location.search);
const statusEl = document.getElementById('status');
const videoEl = document.getElementById('avatar');
const unmuteEl = document.getElementById('unmute');

const viewer = (window.viewer = {
  state: 'starting', // starting, connecting, connected, playing, failed
  error: '',
  identity: params.get('identity') || '',
  frames: [], // [shown at (performance.now ms), width, height, mouth open share or null]
  audio: [], // [at (performance.now ms), rms 0..1]
  stats: [], // receiver stats once a second
  audioLatencyMs: 0, // the audio output's latency, added to audio times
  room: null,
});

function say(text) {
  statusEl.textContent = text;
}

function fail(error) {
  viewer.state = 'failed';
  viewer.error = String(error && error.message ? error.message : error);
  say(`could not join: ${viewer.error}`);
  console.error('viewer failed:', error);
}

async function credentials() {
  const url = params.get('url') || `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`;
  if (params.get('token')) return { url, token: params.get('token') };
  const resp = await fetch('token');
  if (!resp.ok) throw new Error(`no viewer token (${resp.status}): ${await resp.text()}`);
  const body = await resp.json();
  return { url, token: body.token };
}

// -- measurements (only with ?mouth=…) ------------------------------------------------------

const mouthBox = (params.get('mouth') || '').split(',').map(Number);
const measuring = mouthBox.length === 4 && mouthBox.every(Number.isFinite);
const canvas = document.createElement('canvas');
const ctx2d = canvas.getContext('2d', { willReadFrequently: true });

function mouthOpen(width, height) {
  // share of dark pixels in the mouth box, as appliance.reference_runtime.mouth_open_fraction
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  ctx2d.drawImage(videoEl, 0, 0, width, height);
  const s = width / 512;
  const [x0, y0] = [Math.floor(mouthBox[0] * s), Math.floor(mouthBox[1] * s)];
  const [x1, y1] = [Math.floor(mouthBox[2] * s) + 1, Math.floor(mouthBox[3] * s) + 1];
  const data = ctx2d.getImageData(x0, y0, x1 - x0, y1 - y0).data;
  let dark = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] * 0.299 + data[i + 1] * 0.587 + data[i + 2] * 0.114 < 50) dark++;
  }
  return dark / (data.length / 4);
}

function watchFrames() {
  const onFrame = (now, meta) => {
    viewer.frames.push([meta.expectedDisplayTime, meta.width, meta.height,
      measuring ? mouthOpen(meta.width, meta.height) : null]);
    if (viewer.state === 'connected') {
      viewer.state = 'playing';
      say(`watching ${viewer.identity}`);
    }
    videoEl.requestVideoFrameCallback(onFrame);
  };
  videoEl.requestVideoFrameCallback(onFrame);
}

function watchAudio(track) {
  if (!measuring) return;
  // the level as it is played out: after the jitter buffer, like the speaker gets it
  const audioCtx = new AudioContext();
  const analyser = audioCtx.createAnalyser();
  analyser.fftSize = 512;
  audioCtx.createMediaStreamSource(new MediaStream([track.mediaStreamTrack])).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const x of samples) sum += x * x;
    const latencyMs = 1000 * ((audioCtx.outputLatency || 0) + (audioCtx.baseLatency || 0));
    viewer.audioLatencyMs = latencyMs;
    viewer.audio.push([performance.now() + latencyMs, Math.sqrt(sum / samples.length)]);
  }, 5);
}

async function collectStats(tracks) {
  const entry = { at: performance.now() };
  for (const [kind, track] of Object.entries(tracks)) {
    const report = await track.receiver.getStats();
    report.forEach((s) => {
      if (s.type !== 'inbound-rtp') return;
      entry[kind] = {
        framesDecoded: s.framesDecoded, framesPerSecond: s.framesPerSecond,
        frameWidth: s.frameWidth, frameHeight: s.frameHeight, bytesReceived: s.bytesReceived,
        jitterBufferDelay: s.jitterBufferDelay, jitterBufferEmittedCount: s.jitterBufferEmittedCount,
        concealedSamples: s.concealedSamples, totalSamplesReceived: s.totalSamplesReceived,
        packetsLost: s.packetsLost, jitter: s.jitter,
      };
    });
  }
  viewer.stats.push(entry);
}

// -- the room ---------------------------------------------------------------------------------

async function main() {
  const { url, token } = await credentials();
  const room = (viewer.room = new Room());
  const tracks = {};
  room.on(RoomEvent.TrackSubscribed, (track, publication, participant) => {
    if (!viewer.identity && track.kind === Track.Kind.Video) viewer.identity = participant.identity;
    if (participant.identity !== viewer.identity && viewer.identity) return;
    if (track.kind === Track.Kind.Video && !tracks.video) {
      tracks.video = track;
      track.attach(videoEl);
      watchFrames();
    } else if (track.kind === Track.Kind.Audio && !tracks.audio) {
      tracks.audio = track;
      document.body.appendChild(track.attach());
      watchAudio(track);
    }
  });
  room.on(RoomEvent.AudioPlaybackStatusChanged, () => {
    unmuteEl.hidden = room.canPlaybackAudio;
  });
  room.on(RoomEvent.Disconnected, (reason) => say(`disconnected (${reason})`));
  unmuteEl.onclick = () => room.startAudio();
  viewer.state = 'connecting';
  say(`joining ${url} …`);
  await room.connect(url, token);
  viewer.state = 'connected';
  say(`in room ${room.name}: waiting for the avatar's video…`);
  unmuteEl.hidden = room.canPlaybackAudio;
  setInterval(() => collectStats(tracks).catch((e) => console.warn('stats:', e)), 1000);
}

main().catch(fail);
