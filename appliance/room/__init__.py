"""The kiosk in the LiveKit room: joining and reconnecting, publishing, the avatar protocol."""

from appliance.room.connection import KioskRoom, RoomOptions, RoomState, SpeechSink

__all__ = ["KioskRoom", "RoomOptions", "RoomState", "SpeechSink"]
