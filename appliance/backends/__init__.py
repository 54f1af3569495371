"""Backends: what produces the frames for the kiosk's tracks.

    base.py   the Backend interface (a frame source that takes speech)
    local.py  the avatar rendered on this device: the renderer child, model swaps

Remote backends (a GPU endpoint, bitHuman's cloud) and the ladder that picks
one arrive with the fallback issue; each is a new module here.
"""
