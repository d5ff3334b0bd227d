"""peftfx tools: command line, demo and benchmarks."""
