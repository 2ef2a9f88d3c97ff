from importlib import import_module

Migration = import_module("customers.migrations.0001_initial").Migration
