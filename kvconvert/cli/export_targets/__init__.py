"""One module per `kvconvert export <target>` (onnx, engine, triton); each has `register(sub, common)`."""
