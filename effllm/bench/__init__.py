"""Measurements on top of the core: one way to time and to take memory peaks, hardware ceilings, the tidy
rows every measurement writes, and the decoding, fine-tuning and equivalence benchmarks.

Nothing here imports `effllm.report`; `python -m effllm.bench.decode` and `python -m effllm.bench.finetune`
run the benchmarks from the command line.
"""
