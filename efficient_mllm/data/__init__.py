"""efficient_mllm.data"""
