"""SAE Transfer Explorer's command line, `sae-transfer` (see sae_transfer/cli.py)."""
