"""Role store backends and the role cache."""
