"""efficient_mllm.hf"""
