"""The systemd units and sample config, shipped as package data for `edge-runtime install-service`."""
