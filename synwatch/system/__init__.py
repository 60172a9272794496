"""The machine: one argv runner for every command, network namespaces, sysctls,
sd_notify, and the lab namespaces `synwatch try` floods."""
