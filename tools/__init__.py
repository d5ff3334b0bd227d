"""peftfx tools, outside the core library: the command line (cli), the demo, the visualizer (viz),
export, and the benchmarks against HF PEFT (bench)."""
