"""Deployment: export (ONNX, torch.export), ONNX Runtime's fused graph, int8, the server."""
