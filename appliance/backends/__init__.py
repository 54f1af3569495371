"""Backends: what produces the frames for the kiosk's tracks.

    base.py    the Backend interface (a frame source that takes speech)
    local.py   the avatar rendered on this device: the renderer child, model swaps
    hold.py    hold frames while no backend delivers
    ladder.py  which backend serves: local, else the rungs of [fallback] ladder, and back
    cloud.py   bitHuman's cloud rung (session start and end)
    remote.py  a remote worker as the kiosk's private back-end: the relay
"""
