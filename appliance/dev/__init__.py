"""Development only: the LiveKit-compatible dev server, demo, benchmarks, namespaces.

Nothing a kiosk runs in production imports this package (only `appliance run --dev`,
`appliance demo` and the tests do).
"""
