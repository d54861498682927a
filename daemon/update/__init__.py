"""Fleet updates on the device: the signed bundle format, downloads, model slots, the smoke test and the
update agent's state machine."""
