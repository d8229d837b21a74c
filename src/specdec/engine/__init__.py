"""The engine: the decoding loop, its statistics and SWI accounting, incremental text, and the
`Pipeline` that loads models and builds a decoder for any registered method."""
