"""The data floor: an owner's text as documents, then as packed token rows.

``documents`` reads files, folders, globs, JSONL and ``datasets`` directories and splits them by
content; ``packing`` tokenises and cuts them into fixed-length rows; ``datamodule`` serves them to
a Lightning ``Trainer`` (cached); ``tokenizer`` trains a tokenizer for a public model made from
scratch; ``corpus`` builds the offline text domains the demo and tests use. It sits above
``artifacts`` and below ``routing``, which computes statistics over packed rows. Nothing here
sends anything anywhere: an owner's text stays on its machine.
"""
