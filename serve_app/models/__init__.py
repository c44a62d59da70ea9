"""Plain PyTorch model code: no Ray, no HTTP. Deployments wrap these classes."""
