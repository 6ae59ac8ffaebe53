pytest_plugins = ["posttrain.testing"]  # the tiny_model_dir and preference_logps fixtures
