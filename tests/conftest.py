"""Shared test set-up: the project root is a flat Determined model directory, so tests import its
modules directly."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The Cloud Storage emulator fixtures, shared by every test module that asks for them by name.
from gcs_fixtures import fault_proxy, gcs_admin_client, gcs_emulator, gcs_env, imagenet_bucket  # noqa: E402,F401
