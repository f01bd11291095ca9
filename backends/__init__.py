"""The engine side: adapters that turn a model spec into a process, and the supervisor."""
