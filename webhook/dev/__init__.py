"""For a laptop with no cloud account: the local COS/CI sandbox and the demo."""
