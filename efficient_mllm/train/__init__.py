"""efficient_mllm.train"""
