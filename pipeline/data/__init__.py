"""Reading datasets: the CSV files and their split, image decoding, transforms, captions
as token ids, and the labelled inputs fine-tuning trains on."""
