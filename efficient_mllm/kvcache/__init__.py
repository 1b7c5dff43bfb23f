"""efficient_mllm.kvcache"""
