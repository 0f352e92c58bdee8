"""KServe: InferenceService manifests and stock-runtime storage written from a capacity plan.

plan.py (what one pod runs, from the capacity report), manifests.py (InferenceService, TorchServe's
config.properties), validate.py (the vendored CRD's schema and KServe's own rules).
"""
