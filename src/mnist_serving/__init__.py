"""The code shipped inside the registered model: what `mlflow models serve` runs.

It imports nothing from the pipeline (`mnist_mlops`), so a served version carries only this
package (MLflow `code_paths`) and keeps the validation it was logged with.
"""
