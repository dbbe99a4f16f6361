"""Benchmark-format evaluation: LLaVA's `model_vqa_loader` question and answer
files, the batched harness behind eval.py, and the benchmarks' scorers."""
