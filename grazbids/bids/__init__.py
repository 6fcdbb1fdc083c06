"""The BIDS layer: file naming (``naming``), the file-name patterns grazbids reads back
(``patterns``), participant/image selection (``selection``) and participants.tsv
(``participants``)."""
