"""Looking inside a model: where an MoE decoder sends each token (`routing`)."""
