"""efficient_mllm.evaluate"""
