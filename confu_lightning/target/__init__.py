"""The frozen target model: loading (`registry`), the forward wrapper (`wrapper`), tiny test targets (`tiny`)."""
