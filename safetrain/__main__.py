from safetrain.cli import run

run()
