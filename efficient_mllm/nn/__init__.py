"""efficient_mllm.nn"""
