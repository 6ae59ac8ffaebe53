"""posttrain's shipped recipes (package data: ``posttrain recipes`` lists them, ``posttrain recipes --show
NAME`` prints one, ``posttrain init NAME`` writes one out to edit)."""
