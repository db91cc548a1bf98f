"""The provisioning station at the line."""
