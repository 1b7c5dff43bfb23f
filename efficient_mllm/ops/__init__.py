"""efficient_mllm.ops"""
