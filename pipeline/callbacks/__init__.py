"""Recording callbacks for training loops the project did not write: Lightning and Hugging Face.

Each lives in its own module so that importing one never imports the other framework:
`pipeline.callbacks.lightning` needs `pip install 'lca-pipeline[lightning]'`, `pipeline.callbacks.hf`
needs `pip install 'lca-pipeline[hf]'`. Both record the same store as `lca train` does (theta_0, then one
checkpoint per optimizer step with its minibatch loss and learning rate), so `lca compute STORE` treats
them alike.
"""
