"""The typed config schema (schema) and its YAML and dotted-override reading (io)."""
