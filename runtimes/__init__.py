"""Runtimes that execute bnnc ONNX forms: reference ORT, NumPy deploy executor, TVM."""
