"""What the operator sees: status, problems, states, systemd notify, logs."""
