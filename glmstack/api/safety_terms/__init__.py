"""The default content-safety term list (see glmstack.api.safety for the file format)."""
