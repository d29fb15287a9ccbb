"""`make bench`: performance tables measured side by side in one run, one module per question."""
