"""A small LiveKit-compatible server for development and tests.

The real `livekit` SDK (`rtc.Room`) connects to it.  What it does:

* JWT auth with the API key/secret; the token's identity, name, kind (e.g. agent),
  metadata and attributes show up in the participant info others see.
* Classic two-PeerConnection signalling on `/rtc` (the SDKs' single-PC `/rtc/v1`
  and `/rtc/v1/validate` get a 404 and they fall back, as against an older
  livekit-server); `/rtc/validate` explains refusals (401 + text).  CORS for any
  origin on every answer; `/viewer/` watches a room in a browser.
* Media relayed through aiortc (video decoded and re-encoded, Opus passed through);
  every participant is subscribed to every other participant's tracks, a
  participant's camera and microphone in one (lip-synced) stream.
* Data packets (user data, RPC, byte/text streams) relayed over the `_reliable` /
  `_lossy` channels, honouring destination identities.
* `stop()` / `start()` on the same port simulates an outage: clients try to resume,
  are told to reconnect, and rejoin with their tracks.

What it does not do (by design, it is a dev server):

* Simulcast: publish with `simulcast=False`.  With simulcast on, the SDK falls back
  to a single downscaled layer (512 px wide -> 384, 1280 -> 480).
* Resume: there is no session state to resume; a resume attempt is answered with
  "reconnect", so the SDK does a full reconnect (new participant sid).
* Hidden participants, data tracks, E2EE, TURN/STUN (no ICE servers are ever sent).
  Selective subscription is minimal: a client that joined with
  `auto_subscribe=False` gets no tracks until it asks for them (UpdateSubscription
  by track sid), and keeps what it asked for; tracks published later are not offered.
* Metadata/attribute updates need `canUpdateOwnMetadata` in the token, as in
  livekit-server.

Media needs a non-loopback address on the machine: libwebrtc ignores `lo`, and
aiortc offers host candidates on every interface (the signalling host may be
127.0.0.1).
"""

from appliance.dev.server.auth import AuthError, Grant
from appliance.dev.server.server import DevServer

__all__ = ["AuthError", "DevServer", "Grant"]
