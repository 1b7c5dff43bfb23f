"""efficient_mllm.compress"""
