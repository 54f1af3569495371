"""The kiosk in the LiveKit room.

    connection.py  join, state, reconnect forever; the room as a frame sink
    publisher.py   the avatar's video and audio tracks, audio-clocked
    agent.py       the LiveKit Agents avatar protocol: speech in, playback events out
"""

from appliance.room.agent import SpeechSink
from appliance.room.connection import KioskRoom, RoomOptions, RoomState

__all__ = ["KioskRoom", "RoomOptions", "RoomState", "SpeechSink"]
