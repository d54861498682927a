"""edgellm's host side: export, quantize, evaluate and package models for devices. May import daemon/."""
