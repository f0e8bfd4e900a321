# Bindings for this area live here (see _core.pyx).
