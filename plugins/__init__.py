"""Built-in posttrain plugins, one per module, registered through the posttrain.plugins entry points."""
