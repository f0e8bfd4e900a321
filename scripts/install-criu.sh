#!/usr/bin/env bash
# Placeholder until the CRIU installer lands: only reports.
if command -v criu >/dev/null && criu check >/dev/null 2>&1; then exit 0; fi
echo "statesync setup: no working CRIU >= 4 yet" >&2
exit 0
