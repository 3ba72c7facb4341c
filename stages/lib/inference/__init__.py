"""Using a trained model: the one model loader, batched prediction and export (ONNX, fp16, int8).
Imports model, data and core."""
