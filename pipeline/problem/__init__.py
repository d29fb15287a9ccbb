"""What L is: the model, the data and the loss whose full-split mean LCA integrates."""
