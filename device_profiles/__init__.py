"""The packaged device profiles (TOML files), read by edge_runtime.profiles."""
